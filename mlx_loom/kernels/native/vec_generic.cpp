// The vector kernels compiled for the baseline ISA (NEON on AArch64, SSE2 on x86-64).
#define LOOM_ISA_NS generic
#include "attention_tile.h"
#include "activation_tile.h"
#include "sample_tile.h"
