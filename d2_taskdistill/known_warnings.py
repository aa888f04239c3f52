"""Warnings that detectron2 and torch print at every start and that are not the user's to act
on, silenced by their exact messages; every other warning is left as it is."""
import logging
import re
import warnings

# (category, message start) raised inside detectron2 or torch, not by the user's code.
KNOWN_WARNINGS = [
    # detectron2 decorates helpers with torch.jit.script at import: a FutureWarning on torch
    # 2.14, a DeprecationWarning on 2.11 (the GPU machine's), so any category.
    (Warning, "`torch.jit.script` is deprecated. Please switch to `torch.compile` or `torch.export`."),
    # detectron2's anchor generators call torch.meshgrid without indexing=.
    (UserWarning, "torch.meshgrid: in an upcoming release, it will be required to pass the indexing argument."),
    # detectron2's DefaultTrainer wraps the model with DDP(broadcast_buffers=False).
    (FutureWarning, "`broadcast_buffers` is deprecated. Use `forward_sync_buffers` instead."),
]
# torch.utils.cpp_extension logs this on CPU workers of a machine with a CUDA toolkit and no GPU.
KNOWN_LOG_RECORDS = {"torch.utils.cpp_extension": "No CUDA runtime is found"}


class _DropMessage(logging.Filter):
    def __init__(self, start):
        super().__init__()
        self.start = start

    def filter(self, record):
        return not record.getMessage().startswith(self.start)


def ignore_known_warnings():
    """Install the filters; safe to call repeatedly."""
    for category, start in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(start), category=category)
    for name, start in KNOWN_LOG_RECORDS.items():
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.start == start for f in log.filters):
            log.addFilter(_DropMessage(start))
