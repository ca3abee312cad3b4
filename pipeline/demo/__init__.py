"""The demo: the seeded corpus (its drop schedule, golden versions, eSpeak voices, recording
conditions and recordings: FSDD + eSpeak NG), speech synthesis and the in-process weekly runner."""
