"""The composition root: the one package that knows every service.

`paymentsvc.cli` (the `paymentsvc` command), `paymentsvc.runner` (`serve NAME`),
`paymentsvc.devstack` (`paymentsvc dev`) and `paymentsvc.dev` (sample events and
webhook signing for `send-webhook`, tests and benchmarks). Services import none of it.
"""
