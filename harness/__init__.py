"""harness: the cross-validation framework around bitnet_ref and the reference engines."""
