/* Loaded by llmlite.blas before torch. oneMKL asks these functions whether the CPU is Intel's
   (mkl_serv_intel_cpu in oneMKL 2024, mkl_serv_intel_cpu_true in older releases) and, on any other
   vendor, leaves its AVX2/FMA kernels unused. Answering "yes" lifts only that vendor check: MKL
   still reads the CPU's features (CPUID) to choose among the kernels it has. */
int mkl_serv_intel_cpu(void) { return 1; }
int mkl_serv_intel_cpu_true(void) { return 1; }
