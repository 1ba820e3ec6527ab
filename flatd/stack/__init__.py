"""Stack: from a planned Job to a master array.

`methods` is the registry of combine methods (pure); `combine` holds their kernels
(rejection apart from estimation; compiled in _kernels.c); `pixels` reads row bands of pixels;
`engines` hold the engine seam (`engine.stack(job) -> StackResult`) and its kinds.
"""
