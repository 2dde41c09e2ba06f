"""Fine-tuning: LoRA, rsLoRA, DoRA, QLoRA and full fine-tuning (``llmlite.finetune``), and merging
adapters into a full-precision model (``llmlite.merge``)."""
