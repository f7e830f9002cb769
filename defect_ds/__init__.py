"""defect-ds: few labelled defects in, many realistic defect images with exact masks out."""
__version__ = "0.1.0"
