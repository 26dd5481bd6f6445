"""The DAM profiler: model loading, calibration data, attention capture, the zarr profile store."""
