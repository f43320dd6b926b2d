"""moto's server, checking each S3 request against IAM by the action AWS checks.

moto names the action it checks after the API operation (``s3:HeadObject``,
``s3:UploadPart``, ``s3:ListObjectsV2``); AWS checks IAM actions (``s3:GetObject``,
``s3:PutObject``, ``s3:ListBucket``), which are what a real policy grants. This maps the
one to the other before moto's own policy evaluation, so a test runs the policy jobmesh
ships as AWS would read it. Run as a script: ``python moto_iam_server.py -H HOST -p PORT``.
"""

from __future__ import annotations

import sys
from typing import Any

from moto.iam import access_control
from moto.server import main

# S3 operation -> the IAM action AWS authorizes it by (where the names differ).
IAM_ACTION = {
    "HeadObject": "GetObject",
    "ListObjects": "ListBucket", "ListObjectsV2": "ListBucket", "HeadBucket": "ListBucket",
    "CreateMultipartUpload": "PutObject", "UploadPart": "PutObject",
    "CompleteMultipartUpload": "PutObject", "UploadPartCopy": "PutObject",
    "CopyObject": "PutObject",
    "DeleteObjects": "DeleteObject",
    "ListParts": "ListMultipartUploadParts",
    "ListMultipartUploads": "ListBucketMultipartUploads",
}

_moto_init = access_control.IAMRequestBase.__init__


def _init(self: Any, *args: Any, **kwargs: Any) -> None:
    _moto_init(self, *args, **kwargs)
    service, _, operation = self._action.partition(":")
    if service == "s3":
        self._action = f"s3:{IAM_ACTION.get(operation, operation)}"


access_control.IAMRequestBase.__init__ = _init  # type: ignore[method-assign]

if __name__ == "__main__":
    main(sys.argv[1:])
