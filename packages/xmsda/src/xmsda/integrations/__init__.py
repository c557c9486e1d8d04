"""Other libraries' models on the xmsda op: a switch for Hugging Face transformers (`transformers`), drop-ins for
code that calls the attention the way Deformable DETR's ops and mmcv do (`mmcv_style`)."""
