// The vector kernels compiled with -mavx2 -mfma (CMakeLists.txt); callers check cpuid first.
#define LOOM_ISA_NS avx2
#include "attention_tile.h"
#include "activation_tile.h"
#include "sample_tile.h"
