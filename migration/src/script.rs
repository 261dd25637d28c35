//! placeholder: see the helper task
