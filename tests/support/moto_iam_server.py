"""moto's server, checking each S3 request against IAM by the action AWS checks.

moto names the action it checks after the API operation (``s3:HeadObject``,
``s3:UploadPart``, ``s3:ListObjectsV2``); AWS checks IAM actions (``s3:GetObject``,
``s3:PutObject``, ``s3:ListBucket``), which are what a real policy grants. This maps the
one to the other before moto's own policy evaluation, so a test runs the policy jobmesh
ships as AWS would read it.

moto evaluates no condition of a user's policy either (it takes any operator it does not
know, and all but StringEquals, as met, and a statement whose condition fails as a
Deny). For S3 requests a statement is evaluated here as AWS does: it applies when its
action, resource and every condition match, with the condition keys our policies use
(``s3:prefix``, ``s3:if-none-match``, ``s3:ObjectCreationOperation``) taken from the
request, and the operators StringEquals, StringLike, Null and Bool; any other
operator fails the request, rather than pass unchecked.

Run as a script: ``python moto_iam_server.py -H HOST -p PORT``.
"""

from __future__ import annotations

import re
import sys
import threading
from typing import Any
from urllib.parse import parse_qs, urlsplit

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

# s3:ObjectCreationOperation: true for the requests that create an object, false for the
# steps of a multipart upload (which cannot carry If-None-Match).
CREATES = {"PutObject", "CompleteMultipartUpload", "CopyObject"}
UPLOAD_STEPS = {"CreateMultipartUpload", "UploadPart", "UploadPartCopy"}
LISTS = {"ListObjects", "ListObjectsV2"}

_moto_init = access_control.IAMRequestBase.__init__
_moto_check = access_control.IAMRequestBase.check_action_permitted
_moto_statement = access_control.IAMPolicyStatement.is_action_permitted
_request = threading.local()  # the condition values of the S3 request being checked


def _init(self: Any, *args: Any, **kwargs: Any) -> None:
    _moto_init(self, *args, **kwargs)
    service, _, operation = self._action.partition(":")
    if service == "s3":
        self._action = f"s3:{IAM_ACTION.get(operation, operation)}"
        self._condition_values = s3_condition_values(operation, self._headers, self._path)


def s3_condition_values(operation: str, headers: Any, path: str) -> dict[str, str]:
    """The condition keys (lower case) an S3 request carries, as AWS sets them."""
    values: dict[str, str] = {}
    if operation in CREATES | UPLOAD_STEPS:
        values["s3:objectcreationoperation"] = str(operation in CREATES).lower()
    for name, value in headers.items():
        if name.lower() == "if-none-match":
            values["s3:if-none-match"] = value
    if operation in LISTS and "prefix" in (query := parse_qs(urlsplit(path).query)):
        values["s3:prefix"] = query["prefix"][0]
    return values


def _check(self: Any, resource: str) -> None:
    _request.values = getattr(self, "_condition_values", None)
    try:
        _moto_check(self, resource)
    finally:
        _request.values = None


def _statement(self: Any, action: str, resource: str = "*", principal: str | None = None,
               incoming_condition_values: dict[str, str] | None = None) -> Any:
    values = getattr(_request, "values", None)
    if values is None:  # not an S3 request (a role's trust policy, another service)
        return _moto_statement(self, action, resource, principal, incoming_condition_values)
    result = access_control.PermissionResult
    st = self._statement
    if "NotAction" in st:
        concerned = not self._check_element_matches("NotAction", action)
    else:
        concerned = self._check_element_matches("Action", action)
    if (not concerned or "Resource" not in st
            or not self._check_element_matches("Resource", resource)
            or not conditions_hold(st.get("Condition") or {}, values)):
        return result.NEUTRAL
    return result.PERMITTED if st["Effect"] == "Allow" else result.DENIED


def conditions_hold(conditions: dict[str, dict[str, Any]], values: dict[str, str]) -> bool:
    """Every operator's every key matches (a key's values: any one); AWS's semantics."""
    for operator, keys in conditions.items():
        for key, expected in keys.items():
            wanted = [str(w) for w in (expected if isinstance(expected, list) else [expected])]
            actual = values.get(key.lower())
            if operator == "Null":
                if (actual is None) != (wanted[0].lower() == "true"):
                    return False
            elif actual is None:
                return False
            elif operator == "StringEquals":
                if actual not in wanted:
                    return False
            elif operator == "StringLike":
                if not any(re.fullmatch(re.escape(w).replace(r"\*", ".*").replace(r"\?", "."),
                                        actual, re.DOTALL) for w in wanted):
                    return False
            elif operator == "Bool":
                if actual.lower() != wanted[0].lower():
                    return False
            else:
                raise NotImplementedError(f"condition operator {operator} (moto_iam_server)")
    return True


access_control.IAMRequestBase.__init__ = _init  # type: ignore[method-assign]
access_control.IAMRequestBase.check_action_permitted = _check  # type: ignore[method-assign]
access_control.IAMPolicyStatement.is_action_permitted = _statement  # type: ignore[method-assign]

if __name__ == "__main__":
    main(sys.argv[1:])
