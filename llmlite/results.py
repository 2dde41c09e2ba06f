"""What every verb of the API returns: a dataclass that also reads as the dictionary that the
CLI prints and the JSON files hold (``result["perplexity"]``, ``result.to_dict()``). A leaf."""

from __future__ import annotations

import dataclasses
from typing import Any


class Result:
    """Base of the verbs' result dataclasses: ``to_dict()`` (every field, nested results and
    dataclasses as dicts) and read-only mapping access to it."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __contains__(self, key: object) -> bool:
        return key in self.to_dict()

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)

    def keys(self):
        return self.to_dict().keys()


def _plain(value: Any) -> Any:
    if isinstance(value, Result):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value
