"""Building blocks of ``python -m se_fused.train`` (the entry point is :mod:`se_fused.train`).

* :mod:`.distributed` - torchrun's environment, device and process-group setup, a CPU SyncBatchNorm.
* :mod:`.data` - ImageFolder and synthetic data sets, samplers that shard by rank and resume mid-epoch.
* :mod:`.checkpoint` - atomic, checksummed checkpoints and RNG states.
* :mod:`.models` - the networks the trainer builds by name (ResNet-50, SE-ResNet-50 and tiny test sizes).
"""


class SetupError(RuntimeError):
    """A training run cannot start as asked (bad flag, missing data, unusable device or backend, bad checkpoint).

    ``python -m se_fused.train`` prints the message and exits with status 2, without a traceback.
    """
