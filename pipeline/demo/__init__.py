"""The demo: the seeded corpus (its schedule and recordings: FSDD + eSpeak NG), speech
synthesis and the in-process weekly runner."""
