"""The converter of dlib's networks to ONNX and the writer of the Triton model repository
(``facegrid models build``). Installed with the ``models`` extra (onnx); no service
imports it: the services read the repository it writes.
"""
