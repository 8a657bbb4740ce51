"""Detection transfer: Faster R-CNN fine-tuned from a pretrained ftcl backbone, scored with
Detectron2's Pascal VOC evaluator and pycocotools' COCOeval.

The protocol is MoCo's (He et al., "Momentum Contrast for Unsupervised Visual Representation
Learning", CVPR 2020, sec. 4.2 and appendix), which the FT paper (Zhu et al., ICCV 2021) follows for
its "VOC07+12 det" column: Faster R-CNN R50-C4, all layers fine-tuned with synchronised BatchNorm,
VOC07+12 trainval, 24k iterations of batch 16, evaluated on VOC07 test. Those are the defaults of the
``detection`` config section (``ftcl/resources/defaults.yaml``); a demo config shrinks them.

One job per module, each importable on its own:

* :mod:`ftcl.detection.model`: the detector (C4 or FPN head on the backbone, norm conversion,
  MoCo's extra res5 norm, aligned RoIAlign, Detectron2's predictor init);
* :mod:`ftcl.detection.norm`: BatchNorm as SyncBN over MoCo's 8 GPUs x 2 images computes it, in one process;
* :mod:`ftcl.detection.train`: the fine-tuning loop (same-orientation pairs, lr schedule, exact resume) and
  Precise BN;
* :mod:`ftcl.detection.metrics`: the metrics as pure functions (numpy and pycocotools, no torch);
* :mod:`ftcl.detection.stage`: data, the ``ftcl detect`` command, result files, MLflow.

Nothing is imported here, so ``ftcl.detection.metrics`` stays free of torch.
"""
