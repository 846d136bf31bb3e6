"""certify-zoo: turn a pretrained image classifier into a certifiably robust one (Adversarial Boot Camp)."""

__version__ = "0.1.0"
