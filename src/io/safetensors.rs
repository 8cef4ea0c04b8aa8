//! `.safetensors` activation files (memory-mapped). Skeleton: the io helper fills this in.
