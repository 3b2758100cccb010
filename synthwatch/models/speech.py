"""The audio every speech model here takes: 16 kHz mono, in windows of 64,600 samples.

Both numbers are AASIST's (Jung et al., ICASSP 2022; clovaai/aasist `nb_samp`): its
weights were trained on 16 kHz ASVspoof 2019 LA audio, and its graph-pooling sizes follow
from the window length. The sampler decodes audio to this rate and the audio operator
cuts windows of this length, so they read them from here. No imports: the sampler's
child process and the numpy-only audio windows use it without loading torch.
"""

SAMPLE_RATE = 16000
"""Samples per second of every decoded audio track and every model input."""

INPUT_SAMPLES = 64600
"""One model input: about 4.04 s at `SAMPLE_RATE`."""
