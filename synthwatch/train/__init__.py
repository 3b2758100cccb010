"""Training synthwatch's own detectors from real media alone.

`nets` holds the two small CNNs, `sbi` and `fingerprint` make pseudo-fakes from real
pictures (self-blended faces; simulated generator up-sampling), `data` collects the
real media and its manifest, and `loop` trains, validates and writes the weights and
the report a model card is written from. Nothing here downloads anything.
"""

from synthwatch.train.loop import TrainReport, train_fingerprint, train_sbi

__all__ = ["TrainReport", "train_fingerprint", "train_sbi"]
