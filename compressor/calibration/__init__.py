"""Calibration: token windows (windows.py), the statistics collected from them (collect.py), and the
one layer-sequential driver that runs a recipe's stages (driver.py)."""
