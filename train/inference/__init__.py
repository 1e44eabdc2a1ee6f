"""Segmenting new images with a run or an exported model folder.

- ``predictor``: :class:`Predictor` (stage one for new images exactly as the store's, then the model), ``predict``.
- ``batch``: ``predict_batch``: a folder or a table of images → masks, probabilities, predictions.csv.
"""
