"""`defect-ds evaluate`: FID, KID, IS, mask localisation and diversity of generated images."""
