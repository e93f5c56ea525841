"""Redis: connecting (one server, a Cluster or through Sentinel), the settings and the ACL
permissions checked at start.

May use `syncd.config` and the shared modules. Key names are built in `syncd.keys`.
"""
