"""Delta compression: packing, quantizer, methods, calibration, tuning, quality."""
