"""Drop the import-time notices of bitsandbytes' optional CPU kernel: noise for fura users (imported first by `fura`).

On import, bitsandbytes (0.50) tries to fetch an optional CPU kernel, ``kernels-community/quantization-bitsandbytes``,
through the `kernels` package. Nothing in fura needs that kernel, yet a fura user sees up to two lines only because
fura imported bitsandbytes:

- bitsandbytes: ``Failed to load CPU gemm_4bit_forward from kernels-community: …`` (the kernel or the hub is missing);
- `kernels` (0.19): ``Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging
  Face Hub is in offline mode.`` (printed when ``HF_HUB_OFFLINE=1``).

Exactly these two are dropped; every other message of both libraries passes, including the same trust notice
for any other kernel repository.
"""

import logging

BNB_KERNEL_REPO = "kernels-community/quantization-bitsandbytes"
# logger name -> the start of the one message dropped from it
DROPPED = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward",
    "kernels._internals.hf_hub": f"Skipping publisher trust check for '{BNB_KERNEL_REPO}'",
}


class DropNotice(logging.Filter):
    """Drop the records of one logger whose message starts with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


for _name, _prefix in DROPPED.items():
    logging.getLogger(_name).addFilter(DropNotice(_prefix))
