"""Passes over the qir IR (installed as ``qir.passes``).

The pass infrastructure (``Pass``, the registry, pipeline strings, the pass
manager and its instruments) lands with the pass-infrastructure issue; this
package exists now so the import namespace is fixed from the start.
"""
