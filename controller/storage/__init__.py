"""The store as a whole: retention of every job's snapshots, garbage collection, usage.

Sidecars only add to the store; everything that deletes lives here, in the
controller: ``retention`` (which snapshots a job keeps: pure), ``gc`` (drop
what retention lets go, then every object no manifest references), and
``usage`` (what each job holds, unique and shared).
"""
