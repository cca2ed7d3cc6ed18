"""Tools beside the core: benchmarks, the cost model, the GPU check, studies, data preparation (README)."""
