"""`defect-ds downstream`: segmenters trained on real, copy-paste and generated defects, scored on held-out real ones."""
