"""How a store's split reaches a model: samples, readers, the few-shot protocol, the training feed.

- ``readers``: :class:`Sample` / :class:`ImageSample`, the readers :class:`SplitFeatures` / :class:`SplitImages`,
  the few-shot subset (:func:`choose_subset`), which blocks and steps a fit reads.
- ``feed``: the next batches made on a thread while the model computes (pinned, float16 to a GPU).
- ``stores``: which store of a cache folder the plain U-Net baseline reads its images from.
"""
