"""The model and its edits: what transfer learning changes before anything is cached.

- :mod:`~fastft.model.surgery`: replace the output layer, insert or remove layers, freeze
  (the public namespace of the edits);
- :mod:`~fastft.model.layer_edits`: inserting and removing hidden layers;
- :mod:`~fastft.model.freezing`: freezing and unfreezing parameters by name, pattern, depth;
- :mod:`~fastft.model.heads`: find a model's output layer (its contract first), build new heads;
- :mod:`~fastft.model.attach`: attach the new head, sized from what reaches it;
- :mod:`~fastft.model.calling`: how a model is called on a dict, where its logits are;
- :mod:`~fastft.model.blocks`: the blocks a model is made of, and unfreezing the top ones;
- :mod:`~fastft.model.status`: which modules are new, frozen or trainable, eval mode, summary.
"""
