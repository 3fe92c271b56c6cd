//! API request and response types shared by the daemon and tilectl.
