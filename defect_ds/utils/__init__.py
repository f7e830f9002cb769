"""Small helpers that three or more areas share: device choice, atomic folders, free ports."""
