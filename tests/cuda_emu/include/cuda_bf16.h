/* cuda_bf16.h - empty for tests/cuda_emu: the kernels convert 16-bit floats with
 * core/scalar.h off the device, and include/mma.cuh does the tensor-core math. */
#pragma once
