"""`defect-ds generate`: new defect images with exact masks from a trained run."""
