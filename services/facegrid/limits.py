"""The contract's size limits that several services (and the client) check, one name each."""

from __future__ import annotations

# The most faces one image yields: DetectFaces, IndexFaces, the identification flow.
MAX_FACES_PER_IMAGE = 100
# The smallest face the detector finds (about 21 pixels, at its largest enlargement).
MIN_FACE_SIZE = 20
# A display name (collections, stream processors) and a description (collections).
MAX_DISPLAY_NAME = 256
MAX_DESCRIPTION = 2000
