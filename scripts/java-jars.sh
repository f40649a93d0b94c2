# Sourced by scripts/kafka.sh and scripts/debezium.sh: the Java they run on, and jars resolved
# from Maven Central with their runtime dependencies. The sourcing script defines `die`.

# need_java WHO: dies unless $JAVA (default java) is Java 17 or newer, naming WHO (the program
# that needs it) and how to install one.
need_java() {
    local who=$1 major
    command -v "${JAVA:-java}" >/dev/null 2>&1 ||
        die "Java is missing: $who needs a Java 17 or newer (Debian: apt-get install openjdk-17-jdk-headless; the tests' Java consumer needs the JDK), or set JAVA to one"
    major=$("${JAVA:-java}" -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')
    [ "${major:-0}" -ge 17 ] 2>/dev/null ||
        die "Java $major is too old: $who needs Java 17 or newer (Debian: apt-get install openjdk-17-jdk-headless)"
}

# need_maven WHAT: dies unless Maven is installed, saying it fetches WHAT.
need_maven() {
    command -v mvn >/dev/null 2>&1 ||
        die "Maven is missing: it fetches $1 from Maven Central (Debian: apt-get install maven)"
}

# maven_dependency GROUP ARTIFACT VERSION: one <dependency> element of a pom.
maven_dependency() {
    printf '    <dependency><groupId>%s</groupId><artifactId>%s</artifactId><version>%s</version></dependency>\n' "$@"
}

# maven_copy_dependencies WHAT INTO DEPENDENCIES: resolves the DEPENDENCIES (maven_dependency
# elements) and their runtime dependencies into the folder INTO, replacing it. On failure it
# prints Maven's log, removes INTO and dies naming WHAT.
maven_copy_dependencies() {
    local what=$1 into=$2 dependencies=$3 work
    work=$(mktemp -d)
    cat >"$work/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>outbox-relay</groupId>
  <artifactId>fetch-${what//[^A-Za-z0-9._-]/-}</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
$dependencies
  </dependencies>
</project>
EOF
    rm -rf "$into"
    mkdir -p "$into"
    if ! (cd "$work" && mvn -q -B dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$into" >"$work/mvn.log" 2>&1); then
        cat "$work/mvn.log" >&2
        rm -rf "$work" "$into"
        die "Maven could not fetch $what (see above); is Maven Central reachable?"
    fi
    rm -rf "$work"
}
