"""What the server learns from what crosses the cut: an inversion attack and leakage scores
(``privacy-eval``; docs/privacy.md). :mod:`~adc_flwr.privacy.audit` runs it."""
