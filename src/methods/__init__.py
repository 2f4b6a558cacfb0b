"""The methods, one module each, mirroring conf/method/<name>.yaml; every one is a subclass of the
contract, `src.methods.base.Method`."""
