"""The names of the certificates, as every output (card, plot, zoo) spells them: one place, imported by all."""
from __future__ import annotations

# Order and wording of certificates everywhere; the keys are those of certification.json's "certificates".
CERTIFICATE_LABELS = {"monte_carlo": "Monte-Carlo", "deterministic": "deterministic",
                      "deterministic_lipschitz": "deterministic Lipschitz"}
DETERMINISTIC = ("deterministic", "deterministic_lipschitz")
