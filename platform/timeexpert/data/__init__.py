"""Data: public annotation formats, the synthetic benchmark, video decoding, Ray Data pipeline."""
