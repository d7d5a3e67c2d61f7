"""Compression of Wav2Lip generators for deployment.

- :mod:`compress.fold`: fold BatchNorm into the preceding conv or transposed conv.
- :mod:`compress.complexity`: parameter and per-frame MAC counts, under both conventions for
  transposed convolutions.
- :mod:`compress.quantize`: static int8 post-training quantization with torchao PT2E, atomic
  save and load of the exported program, and PSNR.

Submodules are imported on demand, so ``import compress`` stays cheap and does not pull in torchao.
"""
