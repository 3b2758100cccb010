"""Training synthwatch's own detectors from real media alone.

`nets` holds the two small CNNs, `sbi` and `fingerprint` make pseudo-fakes from real
pictures (self-blended faces; simulated generator up-sampling), `data` collects the
real media and its manifest, and `loop` trains, validates and writes the weights and
the report a model card is written from. Nothing here downloads anything.

Training needs torch (`pip install 'synthwatch[train]'`); the package itself imports
nothing, so `labels` (read by `synthwatch eval` and `calibrate`) works in the scanner's
environment, which has no torch.
"""
