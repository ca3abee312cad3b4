"""The demo: the seeded corpus (FSDD + eSpeak NG), speech synthesis and the in-process weekly runner."""
