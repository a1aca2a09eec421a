/* mcp_run: a bash loadable builtin that makes one bash the sandbox's command starter (a
 * "zygote"): it forks a copy of itself per command, and the copy becomes what `bash -c
 * COMMAND` would have been. Under gVisor's ptrace platform, exec'ing bash is most of a tiny
 * command's cost (~10 ms here); forking this small, already started bash costs ~3.
 *
 * The agent starts, through its spawner, as the sandbox user:
 *     bash -c 'enable -f .../bash-run.so mcp_run && mcp_run 3 RESERVE' mcp-codeexec-zygote PAD
 * (PAD: RESERVE bytes of room in the argument area, which a command's shell writes its
 * command over, so that its /proc/PID/cmdline reads `bash -c COMMAND` and NULs: ps and
 * pgrep show exactly `bash -c COMMAND`; the zygote zeroes PAD at once, so that it shows as
 * `bash -c BOOTSTRAP mcp-codeexec-zygote`), with fd 3 a SOCK_SEQPACKET socket to the agent. It speaks the
 * spawner's protocol (agent/process.py): 12-byte answers (kind, request number, value):
 * READY once, then SPAWNED (pid) or FAILED (errno) per request, and EXITED (wait status)
 * when that child ends. A request is one message: a 4-byte request number, the directory
 * (NUL-terminated), the command (no NUL), with three file descriptors for the child's
 * stdin, stdout and stderr.
 *
 * Once, in the zygote: it leaves no trace of the bootstrap that a fresh `bash -c` would not
 * have ($0 "bash" and no positional parameters, no PIPESTATUS, the builtin gone from `enable`,
 * `type` and `help`), is not dumpable (no tracing it), and its own 0, 1 and 2 become a
 * directory (nothing written into them through /proc/PID/fd goes anywhere).
 * Per command, in the child: its own session, the request's fds as 0, 1, 2 and no other,
 * dumpable, the signal mask bash started with, then what differs between two processes:
 * $$, $PPID, the process group bash keeps, RANDOM's seed, SECONDS' clock; and what the
 * command sets: $BASH_EXECUTION_STRING, $_ (from the environment, else $0), the command line.
 * It then runs the command as bash -c does: parse_and_execute(command, "-c",
 * SEVAL_NOHIST|SEVAL_RESETLINE) at the top parse level (error messages say `bash: -c: line
 * 1:`, and a last simple command is exec'd without another fork), then exit_shell.
 *
 * The zygote is the user's process: the agent checks every answer, kills it when it stops
 * answering, and starts commands another way meanwhile. Anything unexpected here ends the
 * zygote (exit 126) before a command would run differently. */
#include <config.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "builtins.h"
#include "shell.h"
#include "common.h"
#include "execute_cmd.h"
#include "jobs.h"

extern int parse_and_execute_level;
extern int executing_builtin;

#define NAME "mcp_run"
#define READY 1
#define SPAWNED 2
#define FAILED 3
#define EXITED 4
#define PREPARED 5
#define MAX_REQUEST (256 * 1024)
#define MAX_CHILDREN 1024

static int control = -1;
static int children_fd = -1;
static sigset_t started_mask;
static char *boot;         /* the bootstrap's argument string: where a child's command line goes */
static size_t boot_room;   /* its bytes, the NUL and the reserve */
static struct { pid_t pid; int32_t number; } running[MAX_CHILDREN];

static void answer_with(int32_t kind, int32_t number, int32_t value, int fd)
{
  int32_t a[3] = {kind, number, value};
  struct iovec iov = {a, sizeof a};
  char ancillary[CMSG_SPACE(sizeof(int))];
  struct msghdr msg = {0};

  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  if (fd >= 0) {
    struct cmsghdr *c;
    memset(ancillary, 0, sizeof ancillary);
    msg.msg_control = ancillary;
    msg.msg_controllen = sizeof ancillary;
    c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof fd);
  }
  if (sendmsg(control, &msg, MSG_NOSIGNAL) != (ssize_t)sizeof a)
    _exit(0);  /* the agent is gone */
}

static void answer(int32_t kind, int32_t number, int32_t value)
{
  answer_with(kind, number, value, -1);
}

/* One message from `sock` into buf (NUL-terminated) with up to three fds (more: the
 * message counts as malformed, and every fd that came is closed by the caller). */
static ssize_t receive(int sock, char *buf, size_t cap, int fds[3], int *nfds)
{
  char ancillary[CMSG_SPACE(4 * sizeof(int))];
  struct iovec iov = {buf, cap};
  struct msghdr msg = {0};
  struct cmsghdr *c;
  ssize_t n;
  int i, extra = 0;

  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = ancillary;
  msg.msg_controllen = sizeof ancillary;
  *nfds = 0;
  do
    n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
  while (n < 0 && errno == EINTR);
  if (n < 0)
    return n;
  for (c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c))
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
      int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int)), fd;
      for (i = 0; i < count; i++) {
        memcpy(&fd, CMSG_DATA(c) + i * sizeof(int), sizeof fd);
        if (*nfds < 3)
          fds[(*nfds)++] = fd;
        else {
          close(fd);
          extra = 1;
        }
      }
    }
  buf[n] = '\0';
  if (extra || (msg.msg_flags & (MSG_TRUNC | MSG_CTRUNC)))
    return -2;
  return n;
}

/* "DIR\0COMMAND" (size bytes): the command, or NULL if malformed (a NUL in the command). */
static char *split_command(char *buf, size_t size)
{
  char *nul = memchr(buf, '\0', size), *command;

  if (nul == NULL)
    return NULL;
  command = nul + 1;
  if (strlen(command) != (size_t)(buf + size - command))
    return NULL;
  return command;
}

static void hide_builtin(void)
{
  int i;

  for (i = 0; i < num_shell_builtins; i++)
    if (shell_builtins[i].name && strcmp(shell_builtins[i].name, NAME) == 0) {
      memmove(shell_builtins + i, shell_builtins + i + 1, (size_t)(num_shell_builtins - i - 1) * sizeof *shell_builtins);
      num_shell_builtins--;
      return;
    }
}

/* argv is "bash" "-c" BOOT NAME PAD: the room from BOOT to PAD's end (PAD zeroed), or 0. */
static size_t command_room(char *argument, intmax_t reserve)
{
  char *pad;

  if (argument == NULL || reserve <= 0 || memcmp(argument - 4, "\0-c\0", 4) != 0)
    return 0;
  pad = argument + strlen(argument) + 1;
  pad += strlen(pad) + 1;
  if (strlen(pad) != (size_t)reserve)
    return 0;
  memset(pad, 0, (size_t)reserve);
  return (size_t)(pad - argument) + (size_t)reserve + 1;
}

static void reap(void)
{
  struct signalfd_siginfo info;
  pid_t pid;
  int status, i;

  while (read(children_fd, &info, sizeof info) > 0)
    ;
  while ((pid = waitpid(-1, &status, WNOHANG)) > 0)
    for (i = 0; i < MAX_CHILDREN; i++)
      if (running[i].pid == pid) {
        running[i].pid = 0;
        answer(EXITED, running[i].number, status);
        break;
      }
}

static void run_child(const char *command, int fds[3]) __attribute__((noreturn));
static void run_child(const char *command, int fds[3])
{
  char *lastarg, *copy;
  SHELL_VAR *seconds;
  size_t length = strlen(command);
  int i;

  if (control >= 0)
    close(control);
  if (children_fd >= 0)
    close(children_fd);
  if (getsid(0) != getpid() && setsid() < 0)
    _exit(126);
  for (i = 0; i < 3; i++)
    if (dup2(fds[i], i) < 0)
      _exit(126);
  for (i = 0; i < 3; i++)
    if (fds[i] > 2)
      close(fds[i]);
  if (prctl(PR_SET_DUMPABLE, 1, 0, 0, 0) != 0)
    _exit(126);
  sigprocmask(SIG_SETMASK, &started_mask, NULL);

  /* What differs between two processes. */
  dollar_dollar_pid = getpid();
  set_ppid();
  shell_pgrp = getpid();
  seedrand();
  seedrand32();
  seconds = find_variable("SECONDS");  /* restart its clock, and hold no value, as at startup */
  if (seconds && seconds->assign_func) {
    (*seconds->assign_func)(seconds, "0", -1, 0);
    FREE(value_cell(seconds));
    var_setvalue(seconds, (char *)NULL);
    VUNSETATTR(seconds, att_integer);  /* reading it (find_variable) made it an integer */
  }

  /* What the command sets. */
  copy = savestring(command);
  command_execution_string = copy;
  bind_variable("BASH_EXECUTION_STRING", copy, 0);
  lastarg = getenv("_");  /* bash starts with $_ from the environment, else $0 */
  bind_variable("_", lastarg ? lastarg : dollar_vars[0], 0);
  if (boot_room && length + 1 <= boot_room) {
    memset(boot, 0, boot_room);
    memcpy(boot, command, length);
  }

  executing_builtin = 0;
  parse_and_execute_level = 0;  /* parse_and_execute makes it 1, as for bash -c */
  parse_and_execute(savestring(command), "-c", SEVAL_NOHIST | SEVAL_RESETLINE);
  exit_shell(last_command_exit_value);
  _exit(126);  /* not reached */
}

/* In a command's child, once the zygote or the child itself tried to enter `dir` (`error`:
 * errno if that failed): bash's own idea of its directory (`pwd`, $PWD) becomes what a bash
 * started there would have. The zygote itself runs in /, so a workspace the user makes
 * unusable cannot stop it. If the directory cannot be entered (say chmod 000), the command
 * runs in / instead, and its stderr says so first (the agent's Python paths say the same,
 * agent/process.py: NO_CWD): failing would leave the user no command to undo it with. */
static void enter_dir(const char *dir, int error, int err_fd)
{
  if (error) {
    if (chdir("/") != 0)
      _exit(126);
    dprintf(err_fd, "mcp-codeexec: cannot enter %s: %s; this command runs in /\n", dir, strerror(error));
    dir = "/";
  }
  set_working_directory((char *)dir);
  bind_variable("PWD", (char *)dir, 0);
}

/* B, forked ahead: waits for its one command on `sock`. */
static void wait_for_command(int sock) __attribute__((noreturn));
static void wait_for_command(int sock)
{
  static char buf[MAX_REQUEST + 1];
  char *command;
  int fds[3], nfds = 0;
  ssize_t n;

  close(control);
  close(children_fd);
  control = children_fd = -1;
  if (setsid() < 0)
    _exit(126);
  n = receive(sock, buf, MAX_REQUEST, fds, &nfds);
  if (n <= 0 || nfds != 3 || (command = split_command(buf, (size_t)n)) == NULL)
    _exit(n == 0 ? 0 : 126);  /* given up (the socket closed), or nothing it could run */
  close(sock);
  if (*buf)
    enter_dir(buf, chdir(buf) != 0 ? errno : 0, fds[2]);
  run_child(command, fds);
}

static int free_slot(void)
{
  int slot;

  for (slot = 0; slot < MAX_CHILDREN && running[slot].pid; slot++)
    ;
  return slot;
}

static void prepare(int32_t number)
{
  int pair[2], slot = free_slot();
  pid_t pid;

  if (slot == MAX_CHILDREN) {
    answer(FAILED, number, EAGAIN);
    return;
  }
  if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) != 0) {
    answer(FAILED, number, errno);
    return;
  }
  pid = fork();
  if (pid == 0) {
    close(pair[0]);
    wait_for_command(pair[1]);
  }
  close(pair[1]);
  if (pid < 0)
    answer(FAILED, number, errno);
  else {
    running[slot].pid = pid;
    running[slot].number = number;
    answer_with(PREPARED, number, pid, pair[0]);
  }
  close(pair[0]);
}

static void run(int32_t number, char *payload, size_t size, int fds[3], int nfds)
{
  char *command = split_command(payload, size);
  pid_t pid;
  int slot, unusable = 0;

  if (nfds != 3 || command == NULL) {
    answer(FAILED, number, EINVAL);
    return;
  }
  if ((slot = free_slot()) == MAX_CHILDREN) {
    answer(FAILED, number, EAGAIN);
    return;
  }
  if (*payload && chdir(payload) != 0) {
    unusable = errno;
    if (chdir("/") != 0) {
      answer(FAILED, number, errno);
      return;
    }
  }
  pid = fork();
  if (pid < 0) {
    answer(FAILED, number, errno);
    return;
  }
  if (pid == 0) {
    if (*payload)
      enter_dir(payload, unusable, fds[2]);
    run_child(command, fds);
  }
  running[slot].pid = pid;
  running[slot].number = number;
  answer(SPAWNED, number, pid);
}

static void serve(void)
{
  static char buf[MAX_REQUEST + 1];
  struct pollfd polled[2];

  for (;;) {
    int fds[3], nfds = 0, i;
    int32_t number = 0;
    ssize_t n;

    polled[0].fd = control;
    polled[0].events = POLLIN;
    polled[1].fd = children_fd;
    polled[1].events = POLLIN;
    if (poll(polled, 2, -1) < 0) {
      if (errno == EINTR)
        continue;
      _exit(126);
    }
    if (polled[1].revents)
      reap();
    if (!polled[0].revents)
      continue;
    n = receive(control, buf, MAX_REQUEST, fds, &nfds);
    if (n == 0 || n == -1)
      _exit(0);  /* the agent is gone: its children are the agent's now (it is their subreaper) */
    if (n >= (ssize_t)sizeof number)
      memcpy(&number, buf, sizeof number);
    if (n < (ssize_t)sizeof number + 1)
      answer(FAILED, number, E2BIG);
    else if (buf[sizeof number] == 'R')
      run(number, buf + sizeof number + 1, (size_t)n - sizeof number - 1, fds, nfds);
    else if (buf[sizeof number] == 'P' && nfds == 0)
      prepare(number);
    else
      answer(FAILED, number, EINVAL);
    for (i = 0; i < nfds; i++)
      close(fds[i]);
  }
}

int mcp_run_builtin(WORD_LIST *list)
{
  intmax_t fd, reserve;
  sigset_t chld;
  int dir, i;

  if (list == NULL || list->next == NULL || !legal_number(list->word->word, &fd)
      || !legal_number(list->next->word->word, &reserve) || reserve < 0)
    exit_shell(126);
  control = (int)fd;
  if (fcntl(control, F_SETFD, FD_CLOEXEC) != 0 || prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0)
    exit_shell(126);
  dir = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  for (i = 0; i < 3; i++)
    if (dir < 0 || dup2(dir, i) < 0)
      exit_shell(126);
  close(dir);

  /* Once, for every child: the state a fresh `bash -c` starts in. */
  hide_builtin();
  boot = command_execution_string;
  boot_room = command_room(boot, reserve);
  remember_args((WORD_LIST *)NULL, 1);  /* NAME was $0, PAD $1 */
  FREE(dollar_vars[0]);
  dollar_vars[0] = savestring("bash");
  bind_variable("_", "bash", 0);  /* (and $_: each child sets its own) */
  unbind_variable_noref("PIPESTATUS");  /* made by the first command that ends */

  sigemptyset(&chld);
  sigaddset(&chld, SIGCHLD);
  if (sigprocmask(SIG_BLOCK, &chld, &started_mask) != 0)
    exit_shell(126);
  children_fd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);
  if (children_fd < 0)
    exit_shell(126);
  answer(READY, 0, getpid());
  serve();
  return EXECUTION_FAILURE;  /* not reached */
}

static char *mcp_run_doc[] = {"Start commands as bash -c would, for mcp-codeexec's agent.", (char *)NULL};

struct builtin mcp_run_struct = {NAME, mcp_run_builtin, BUILTIN_ENABLED, mcp_run_doc, NAME " socket-fd reserve", 0};
