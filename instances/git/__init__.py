"""Git intake: one bare repository per instance, served over HTTPS (smart HTTP through
`git http-backend`) and SSH (the manager's own asyncssh server); the repositories' hooks
call back into the manager to record the push and stream the build to the pusher."""
