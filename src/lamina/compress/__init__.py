"""Make a trained model smaller and faster: quantize (int8/int4, QAT), prune (magnitude, channels), distill."""
