"""Pure tensor maths of RLHF: losses, advantages, KL estimators. No I/O, no models."""
