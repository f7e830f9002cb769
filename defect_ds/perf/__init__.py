"""Speed: FLOPs per sample, throughput and MFU, and the `defect-ds bench` sweep."""
