"""The tiny training set-up the unit tests share: the embedded digits, an 8-wide convnet at
16x16, one thread (a few seconds per run on 2 cores)."""

TINY = dict(
    dataset="digits",
    backbone="convnet",
    backbone_kwargs={"width": 8},
    image_size=16,
    batch_size=32,
    progress=False,
    threads=1,
)
